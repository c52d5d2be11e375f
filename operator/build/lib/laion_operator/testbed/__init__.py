"""The demo's test bed: a loopback image server that fails like the internet (`fakeweb`), LAION-like
metadata (`demo_data`), and the demo command that runs a part over both (`demo`)."""
