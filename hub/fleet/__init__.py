"""The fleet: enrolment and devices (``devices.py``), label targeting (``targeting.py``), devices' broker
logins and ACL (``broker_auth.py``) and bundle downloads over HTTP with the devices' own credentials
(``device_http.py``)."""
