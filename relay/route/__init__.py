"""The route stage: which destinations get an object (filters, pure) and each one's copy
(router: per-destination rules and de-identification)."""
