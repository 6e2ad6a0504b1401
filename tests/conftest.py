"""Settings every test shares."""

import os

# Everything the tests talk to is on loopback, started by the tests: a forward proxy that the
# machine's environment names (for the package registries, say) must not carry those
# requests (the config reads these variables; the tests that are about them set their own).
for _name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
    os.environ.pop(_name, None)
