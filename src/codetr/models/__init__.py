"""Plain ``torch.nn`` detector code: no Lightning imports below this package."""
