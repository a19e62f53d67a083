"""Paperless-ngx's own client libraries against what hearth provisioned.

Reads the environment exactly as Paperless-ngx 3.0 does (src/paperless/settings/__init__.py and
custom.py at tag v3.0.5: parse_redis_url, parse_db_settings, the CELERY_*, CHANNEL_LAYERS and
CACHES settings, and the signed-pickle serializer of src/paperless/celery.py), then uses each
connection the way the app does: Django's ORM connection over psycopg 3, Django's Redis cache,
one Celery task through the Redis broker and result backend, and one channels_redis group
message. Prints {"ok": true} or {"ok": false, "error": ...}; exits 0 or 1.
"""

import asyncio
import hmac
import json
import os
import pickle
import threading
import traceback
import uuid
from hashlib import sha256

TIMEOUT = 40


def give_up():
    print(json.dumps({"ok": False, "error": f"no answer within {TIMEOUT}s"}), flush=True)
    os._exit(1)


def redis_urls(value):
    """parse_redis_url for what hearth writes (a redis:// URL): the same URL for both."""
    if value is None:
        return ("redis://localhost:6379", "redis://localhost:6379")
    if "unix" in value.lower() or "+socket" in value.lower():
        raise ValueError("hearth writes redis:// URLs only")
    return (value, value)


def database():
    """parse_db_settings, PostgreSQL branch, with no extra PAPERLESS_DB_* options set."""
    engine = os.environ.get("PAPERLESS_DBENGINE")
    if engine is None:
        engine = "postgresql" if "PAPERLESS_DBHOST" in os.environ else "sqlite"
    if engine != "postgresql":
        raise ValueError(f"PAPERLESS_DBENGINE is {engine!r}, not postgresql")
    config = {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": os.getenv("PAPERLESS_DBHOST"),
        "NAME": os.getenv("PAPERLESS_DBNAME", "paperless"),
        "USER": os.getenv("PAPERLESS_DBUSER", "paperless"),
        "PASSWORD": os.getenv("PAPERLESS_DBPASS", "paperless"),
        "CONN_HEALTH_CHECKS": True,
        "OPTIONS": {
            "sslmode": os.getenv("PAPERLESS_DBSSLMODE", "prefer"),
            "sslrootcert": None,
            "sslcert": None,
            "sslkey": None,
            "application_name": "paperless-ngx",
        },
    }
    if "PAPERLESS_DBPORT" in os.environ:
        config["PORT"] = int(os.environ["PAPERLESS_DBPORT"])
    return {"default": config}


def main():
    celery_url, channels_url = redis_urls(os.getenv("PAPERLESS_REDIS"))
    prefix = os.getenv("PAPERLESS_REDIS_PREFIX", "")
    from django.conf import settings

    settings.configure(
        SECRET_KEY="hearth-test-" + uuid.uuid4().hex,
        INSTALLED_APPS=[],
        USE_TZ=True,
        DATABASES=database(),
        CACHES={
            "default": {
                "BACKEND": "django.core.cache.backends.redis.RedisCache",
                "LOCATION": channels_url,
                "KEY_PREFIX": prefix,
            }
        },
        CHANNEL_LAYERS={
            "default": {
                "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
                "CONFIG": {
                    "hosts": [channels_url],
                    "capacity": 2000,
                    "expiry": 15,
                    "prefix": prefix,
                },
            }
        },
        CELERY_BROKER_URL=celery_url,
        CELERY_RESULT_BACKEND=celery_url,
        CELERY_TASK_SERIALIZER="signed-pickle",
        CELERY_RESULT_SERIALIZER="signed-pickle",
        CELERY_ACCEPT_CONTENT=["application/json", "application/x-signed-pickle"],
        CELERY_RESULT_EXPIRES=3600,
        CELERY_WORKER_SEND_TASK_EVENTS=True,
        CELERY_TASK_SEND_SENT_EVENT=True,
        CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP=True,
        CELERY_BROKER_TRANSPORT_OPTIONS={"global_keyprefix": prefix},
        CELERY_TASK_TRACK_STARTED=True,
        CELERY_CACHE_BACKEND="default",
    )
    import django

    django.setup()

    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE documents_document (id serial PRIMARY KEY, title text)")
        cursor.execute("INSERT INTO documents_document (title) VALUES (%s)", ["receipt"])
        cursor.execute("SELECT title FROM documents_document")
        assert cursor.fetchone()[0] == "receipt"
    connection.close()

    from django.core.cache import cache

    cache.set("hearth-check", "cached", 30)
    assert cache.get("hearth-check") == "cached"

    from celery import Celery
    from kombu.serialization import register

    key = settings.SECRET_KEY.encode()

    def dumps(value):
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        return hmac.new(key, data, sha256).digest() + data

    def loads(payload):
        signature, data = payload[:32], payload[32:]
        if not hmac.compare_digest(signature, hmac.new(key, data, sha256).digest()):
            raise ValueError("signed-pickle signature mismatch")
        return pickle.loads(data)

    register(
        "signed-pickle",
        dumps,
        loads,
        content_type="application/x-signed-pickle",
        content_encoding="binary",
    )
    app = Celery("paperless")
    app.config_from_object("django.conf:settings", namespace="CELERY")

    @app.task(name="documents.tasks.consume_file")
    def consume(a, b):
        return a + b

    from celery.contrib.testing.worker import start_worker

    # Paperless runs `celery worker --without-mingle --without-gossip`: heartbeats stay on.
    with start_worker(app, pool="solo", perform_ping_check=False, without_heartbeat=False):
        assert consume.delay(2, 3).get(timeout=20) == 5

    from channels.layers import get_channel_layer

    async def status_update():
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add("status_updates", channel)
        await layer.group_send("status_updates", {"type": "status_update", "data": 1})
        message = await asyncio.wait_for(layer.receive(channel), 10)
        await layer.flush()
        assert message["data"] == 1

    asyncio.run(status_update())


if __name__ == "__main__":
    threading.Timer(TIMEOUT, give_up).start()
    try:
        main()
    except BaseException as error:
        lines = traceback.format_exc().splitlines()[-4:]
        print(json.dumps({"ok": False, "error": f"{type(error).__name__}: {error}", "trace": lines}), flush=True)
        os._exit(1)
    print(json.dumps({"ok": True}), flush=True)
    os._exit(0)
