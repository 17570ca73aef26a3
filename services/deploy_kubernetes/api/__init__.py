"""The deploy server's JSON API (Binder's wire protocol): handlers that call the deployer's
use-case methods, the rendered status answers, the access log and the OpenAPI document."""
