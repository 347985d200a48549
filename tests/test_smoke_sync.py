from tests.world import writes


def test_first_full_sync_then_noop(world):
    world.user()
    for i in range(25):
        world.person(f"Person {i} Test", companyName="Contoso AS", phoneNumber="+47 22 33 44 55")
    r1 = world.sync(mode="full")
    assert r1.status == "succeeded", r1.to_json()
    assert r1.counts["outlookCreated"] == 25
    assert len(world.outlook()) == 25
    r2 = world.sync()
    assert r2.status == "succeeded", r2.to_json()
    assert writes(r2) == 0, r2.to_json()
