"""Developer tools: local servers for tests and benchmarks (servers, celery_cluster), make targets' scripts."""
