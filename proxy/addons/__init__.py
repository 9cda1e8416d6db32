"""mitmproxy addons, one concern each; `proxy/addon.py` composes them for `mitmdump -s`."""
