"""What runs a request, in the gateway or in a worker: the live policy state (`state`) and the
strategies that turn a plan into calls. Below the gateway, the guard and the workers; above the
router and the specialists."""
