"""How and where code runs, never what it computes: start-up, process caches, logging, progress, worker processes, server access."""
