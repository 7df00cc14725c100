"""What the operator configures: settings from env, postdeploy.yaml and flags, checked once
at start; how secrets are masked.
"""
