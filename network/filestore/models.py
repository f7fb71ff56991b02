"""The blob index. The bytes live on disk under blobs/<aa>/<key>; rows record who may read them."""

from django.db import models
from django.utils import timezone


class Blob(models.Model):
    """One stored blob; `last_used_at` (upload, grant or read) drives retention."""

    key = models.CharField(max_length=71, primary_key=True)
    """Its content address (`common.hashing.blob_key`): a sha256's 64 hex characters, or `blake3-` and 64."""
    size = models.BigIntegerField()
    uploaded_by = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        app_label = "filestore"


class Access(models.Model):
    """A party that may read a blob: one that uploaded it (`uploader`: counted in its quota, may grant
    it to others) or one it was granted to. A blob is kept while a row holds it: an uploader's while it has
    uploads not released (`uploads`: each upload holds it once, each release lets one go; at 0 the row stays,
    still counted in its quota, until the blob goes), a reader's only when the uploader handed the blob over to
    its readers (`holds`, until the reader releases it)."""

    blob = models.ForeignKey(Blob, on_delete=models.CASCADE, related_name="access")
    party = models.CharField(max_length=64)
    uploader = models.BooleanField(default=False)
    uploads = models.PositiveIntegerField(default=1)
    holds = models.BooleanField(default=False)

    class Meta:
        app_label = "filestore"
        constraints = [models.UniqueConstraint(fields=["blob", "party"], name="one_access_per_party")]
        indexes = [models.Index(fields=["party", "uploader"], name="access_by_party")]
