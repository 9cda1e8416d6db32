"""The traffic plane: mitmdump with our addons meters, captures and indexes every flow."""
