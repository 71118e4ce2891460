"""Settings for the test suite: DATABASE_URL if set, else an embedded PostgreSQL."""

from django_pgnotify import Notify
from django_pgnotify.embedded import database_settings

SECRET_KEY = "tests-only"
DEBUG = False
USE_TZ = True
TIME_ZONE = "Europe/Berlin"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

DATABASES = {"default": database_settings()}
# A second database on the same server, for --database and using= tests.
DATABASES["other"] = {
    **DATABASES["default"],
    "NAME": f"{DATABASES['default']['NAME']}_other",
    "OPTIONS": dict(DATABASES["default"]["OPTIONS"]),
}

INSTALLED_APPS = [
    "tests.testapp",  # before django_pgnotify on purpose: the Meta option must not care
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.admin",
    "django.contrib.postgres",  # testapp.Measurement's ArrayField
    "django_pgnotify",
    "tests.durableapp",
]

# For the durable events' admin.
ROOT_URLCONF = "tests.urls"
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

PGNOTIFY = {"MODELS": {"auth.User": Notify(fields=["username"], events=["insert"])}}

# For the Channels tests and the docs' examples that name it (nothing forwards by default).
CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
