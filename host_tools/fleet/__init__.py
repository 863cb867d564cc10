"""mpota fleet: devices report what they did (HMAC-signed batches), the server keeps an inventory
derived from those reports, release statistics and anomalies, and a dashboard. docs/fleet.md.

One concern per module: protocol (limits, validation, MAC), storage (SQLite / PostgreSQL),
inventory (what reports mean for a device), monitor (statistics, anomalies), views (the query
functions that the API, the dashboard and the CLI share), web (the ASGI app), dashboard (HTML),
logs (web server logs), client (a CPython reporter and admin client), server (running it),
pgcluster (a throwaway PostgreSQL), cli (the `mpota fleet` verbs).
"""
