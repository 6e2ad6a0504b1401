"""Change alerts: rules, rendering, signing, the transactional outbox and its delivery worker.

Pure parts (:mod:`.rules`, :mod:`.render`, :mod:`.signing`, :mod:`.classify`) do no I/O and
read no clock; :mod:`.outbox` writes and reads the ``alert_outbox`` table; :mod:`.service`
is the delivery worker the daemon hosts; :mod:`.receivers` emulates every chat target.
"""
