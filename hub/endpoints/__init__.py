"""Cloud web-service endpoints: a lean scoring gateway process feeding model worker processes.

* ``gateway``  the per-endpoint HTTP server (uvloop, the device's parser, no framework): keys, traffic split,
               adaptive batching, crash handling; ``edgefleet serve`` runs the same class in the foreground
* ``httpserver`` its HTTP/1.1 (``modules.httpwire``'s parser, bodies in place), the listening socket, the loop
* ``spec``     an endpoint's versions, weights and settings as handed to the gateway
* ``arena``    large request bodies in a sealed shared memory file the workers map read-only
* ``pool``     one model version's worker processes as the gateway sees them
* ``worker``   a worker process in the sandbox: load the verified bundle with the shared runner, score batches
* ``wire``     length-prefixed typed MessagePack frames between gateway and (sandboxed, untrusted) workers
* ``collect``  sampled inputs/outputs (picked by workers, written by the gateway) into ``data_records``
* ``manager``  the hub side: endpoints table, keys, pulling bundles, spawning and steering gateways

See docs/endpoints.md for the design and its measurements.
"""
