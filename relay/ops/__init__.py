"""Operations: the audit log, metrics, log lines (subscribers of the event stream), and the
systemd and HAProxy files the relay renders."""
