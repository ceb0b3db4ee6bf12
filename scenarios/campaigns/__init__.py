"""Campaigns that run many Schedules: explore, soak, the release matrix, differential mode, hunts."""
