from tests.testapp.models import Order


def test_insert_arrives_as_row_changed(changes):
    order = Order.objects.create(status="new", total="12.50")
    (event,) = changes.wait(1)
    assert event.model is Order
    assert event.action == "insert"
    assert event.pk == order.pk


def test_listener_process_prints_events(listener_process):
    proc = listener_process()
    Order.objects.create(status="new", total="1.00")
    proc.wait_for(r"testapp.order insert pk=\d+", stream="out")
    assert proc.stop() == 0
