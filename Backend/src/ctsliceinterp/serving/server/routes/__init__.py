"""The API's endpoints under /v1: ``health`` (health, models) and ``jobs`` (submit, status,
result, delete). Every endpoint but /v1/health needs the token (``auth.require_token``)."""
