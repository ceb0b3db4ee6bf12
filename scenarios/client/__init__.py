"""The SUT-neutral client side of one rank: the run loop, the gates a Schedule opens, and the recorder."""
