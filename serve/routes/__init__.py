"""The gateway's HTTP routes, one router per domain, joined by ``serve.gateway.build_api``.

``deps`` holds what they share: the replica's services, the caller a route requires
(``require``) and the problem statuses routes document.
"""
