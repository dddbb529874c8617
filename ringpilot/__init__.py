"""The user's front door: the `ringpilot` command and the `make demo` launcher.

The top floor: it composes topology/, ray_jobs/ and operators/, and nothing imports it.
"""
