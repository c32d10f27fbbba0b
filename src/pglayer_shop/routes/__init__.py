"""The shop's HTTP routes, one module per resource."""
