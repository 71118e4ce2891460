"""A view that writes, for the audit middleware tests."""

from django.contrib.auth import login
from django.contrib.auth.models import User
from django.http import HttpResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from tests.testapp.models import Order


@csrf_exempt
def create_order(request):
    Order.objects.create(status=request.POST["status"])  # autocommit, as most views write
    response = HttpResponse(status=201)
    response["X-Request-ID"] = request.request_id
    return response


@csrf_exempt
async def create_order_async(request):
    await Order.objects.acreate(status=request.POST["status"])
    response = HttpResponse(status=201)
    response["X-Request-ID"] = request.request_id
    return response


@csrf_exempt
def order_login_order(request):
    """Writes, logs a user in, and writes again."""
    Order.objects.create(status="before login")
    login(request, User.objects.get(username=request.POST["username"]))
    Order.objects.create(status="after login")
    return HttpResponse(status=201)


def count_orders(request):
    return HttpResponse(str(Order.objects.count()))


urlpatterns = [
    path("orders/", create_order),
    path("async/orders/", create_order_async),
    path("orders/count/", count_orders),
    path("orders/login/", order_login_order),
]
