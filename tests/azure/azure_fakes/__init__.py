"""Loopback HTTPS fakes that stand in for Azure (ARM and Azure Files) in tests."""
