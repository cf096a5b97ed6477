"""Privacy accounting (sample- and user-level) and label-DP mechanisms."""
