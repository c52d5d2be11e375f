"""`make bench`: the project against what users run today (see README.md beside this file)."""
