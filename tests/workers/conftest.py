from service_fixtures import prefect_harness, ray_cluster, settings, text_file  # noqa: F401
