"""`make demo`: the whole product end to end on this machine (see `__main__`)."""
