"""How and where code runs, never what it computes: the stage runner, start-up, process caches,
progress, worker processes, the work pool, server access."""
