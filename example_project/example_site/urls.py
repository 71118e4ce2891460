from django.contrib.auth import views as auth_views
from django.urls import path
from shop import views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("orders.json", views.orders_json, name="orders-json"),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(next_page="login"), name="logout"),
]
