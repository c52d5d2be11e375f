"""The test suite, a package: autofaiss installs a top-level `tests` package of its own into
site-packages, which a namespace package (a folder without this file) would lose to."""
