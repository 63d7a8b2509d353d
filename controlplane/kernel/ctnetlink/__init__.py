"""ctnetlink: conntrack dump, delete, re-create, and flow teardown."""
