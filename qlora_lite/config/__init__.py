"""The one settings schema (`settings`), reading it from YAML and the command line (`load`), and sizes (`units`)."""
