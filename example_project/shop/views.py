"""The live orders dashboard: a page, and the orders as JSON for (re)loading it."""

from django.contrib.auth.decorators import login_required, permission_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

from .models import Order

#: The page shows the newest orders, at most this many.
SHOWN = 50


def newest_orders() -> list[dict]:
    orders = Order.objects.order_by("-pk").values("pk", "customer", "status", "total")[:SHOWN]
    return [{**order, "total": str(order["total"])} for order in orders]


@login_required
@permission_required("shop.view_order", raise_exception=True)
def dashboard(request: HttpRequest) -> HttpResponse:
    return render(request, "shop/dashboard.html", {"orders": newest_orders()})


@login_required
@permission_required("shop.view_order", raise_exception=True)
def orders_json(request: HttpRequest) -> JsonResponse:
    """What the page reloads after a reconnect or a resync: changes in the gap were missed."""
    return JsonResponse({"orders": newest_orders()})
