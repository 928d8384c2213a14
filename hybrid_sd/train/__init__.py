"""Training: self-distilled data, AR and block drafters (and, later, the router)."""
