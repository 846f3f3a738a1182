"""MLflow "models from code" entry: the registry logs this file as the pyfunc's model, so no
pickled object is stored; loading it needs only the installed package."""
import mlflow

from pipeline.registry import PufferfishLM

mlflow.models.set_model(PufferfishLM())
