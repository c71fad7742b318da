"""One APIRouter per endpoint family; each takes what it needs from ``request.app.state``."""
