"""What the server tells its operator: request ids and headers, request logging, log lines, metrics.

    requestlog  WSGI middleware: X-Request-ID, security headers, each request's metrics and log line
    logs        the text and JSON line formats, the request-id and phone filters, configure_logging()
    metrics     Prometheus metrics and the /stats summary

The package imports none of them, and telemetry.logs does not import prometheus_client, which
settles its mode when first imported (telemetry.metrics).
"""
