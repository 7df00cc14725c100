"""Test helpers: real Redis, git remotes, services, hosts, stand-ins."""
