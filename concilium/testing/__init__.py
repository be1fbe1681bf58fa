"""Test tools shipped with the project (the fault-injecting fake upstream)."""
