"""How requests reach the broker: one module per transport.

``seqpacket``: a Unix ``SOCK_SEQPACKET`` socket with JSON packets and fds as
``SCM_RIGHTS`` (Linux).  ``xpc``: the XPC Mach service upstream's clients
speak (macOS).  Both feed the same ``Broker`` through its hooks: ``connect``,
``request`` (or ``request_message``) and ``disconnect``.
"""
