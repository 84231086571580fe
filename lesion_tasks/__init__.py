"""lesion_tasks: the logic of the melanoma pipeline (ingestion, training, scoring).

Airflow DAGs, the `lesion` CLI and the tests all call these functions; this package never imports
Airflow.
"""

__version__ = "0.1.0"
