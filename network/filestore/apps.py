from django.apps import AppConfig


class FileStoreConfig(AppConfig):
    name = "fedsilo.network.filestore"
    label = "filestore"
    default_auto_field = "django.db.models.BigAutoField"
