"""Settings of the example project.

The database is ``DATABASE_URL`` when it is set. Otherwise an embedded PostgreSQL is
started for this process (and removed when it exits), and its URL is exported as
``DATABASE_URL`` so that child processes reach the same server.

The live dashboard's channel layer is ``channels_redis`` at ``REDIS_URL`` when that is
set; otherwise the in-memory layer, which works only with the listener inside the ASGI
process (what ``example_site.asgi`` then does).
"""

import os

from django_pgnotify.embedded import database_settings

# Development settings. A real project reads its secret from the environment, with no
# default, and never runs with DEBUG: do not copy these two lines into one.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-project-only-not-a-secret")
DEBUG = True
ALLOWED_HOSTS: list[str] = []
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

#: Whether this process starts its own PostgreSQL (the demo says so in its banner).
EMBEDDED_POSTGRES = not os.environ.get("DATABASE_URL")
DATABASES = {"default": database_settings()}

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django_pgnotify",
    "shop",
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]
ROOT_URLCONF = "example_site.urls"
ASGI_APPLICATION = "example_site.asgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
            ]
        },
    }
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"

#: channels_redis when REDIS_URL is set: the listener may then run in its own process
#: (manage.py pgnotify_listen). Else the in-memory layer, with the listener in the server.
IN_PROCESS_LISTENER = not os.environ.get("REDIS_URL")
if IN_PROCESS_LISTENER:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
else:
    CHANNEL_LAYERS = {
        "default": {
            # The pub/sub layer: pages update sooner than with the core layer's
            # polling consumers (docs/channels.md, "Which channels_redis layer").
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {
                # Longer than channels_redis's 5 s blocking reads (see docs/channels.md).
                "hosts": [{"address": os.environ["REDIS_URL"], "socket_timeout": 15}],
                "prefix": os.environ.get("REDIS_PREFIX", "pgnotify-example"),
            },
        }
    }
PGNOTIFY = {"CHANNEL_LAYER": "default"}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "django_pgnotify": {"handlers": ["console"], "level": "INFO"},
        "shop": {"handlers": ["console"], "level": "INFO"},
    },
}
