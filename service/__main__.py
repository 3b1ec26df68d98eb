"""``dyce-serve``: read the settings from the environment and run uvicorn."""

from __future__ import annotations

import logging
import sys

from pydantic import ValidationError


def main() -> None:
    from .settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings()
    except ValidationError as err:
        problems = "\n".join(f"  {'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in err.errors())
        print(f"dyce-serve: refusing to start:\n{problems}", file=sys.stderr)
        raise SystemExit(2) from None
    if settings.generated_admin_token:
        logging.getLogger("dyce.service").warning(
            "INSECURE DEV MODE: admin token for this run: %s", settings.admin_token.get_secret_value()
        )

    import uvicorn

    from .app import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info", access_log=False)


if __name__ == "__main__":
    main()
