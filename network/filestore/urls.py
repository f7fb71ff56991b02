from django.urls import path

from . import views

urlpatterns = [
    path("api/v1/health", views.HealthView.as_view()),
    path("api/v1/blobs", views.UploadView.as_view()),
    path("api/v1/blobs/<str:key>", views.BlobView.as_view()),
    path("api/v1/blobs/<str:key>/readers", views.GrantView.as_view()),
]

handler404 = views.not_found
handler500 = views.server_error
