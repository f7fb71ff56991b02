"""The blob index. The bytes live on disk under blobs/<aa>/<sha256>; a row records who stored them."""

from django.db import models


class Blob(models.Model):
    sha256 = models.CharField(max_length=64, primary_key=True)
    size = models.BigIntegerField()
    uploaded_by = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        app_label = "filestore"
