from django.apps import AppConfig


class EvolvingConfig(AppConfig):
    name = "tests.evolving"
    label = "evolving"
    default_auto_field = "django.db.models.BigAutoField"
