"""`anomalens serve`: a REST service that scores uploaded images, and the inspector's review page.

    from anomalens.serve import ServeConfig, create_app
    app = create_app(ServeConfig(model=Path("tile.model"), store=Path("results.db"), token="s3cret"))

See docs/serve.md for the endpoints and serve/review.py for the review page's API.
"""

from anomalens.models.base import Inferencer
from anomalens.serve.app import ServeConfig, create_app
from anomalens.serve.model import ServedModel, load_inferencer

__all__ = ["Inferencer", "ServeConfig", "ServedModel", "create_app", "load_inferencer"]
