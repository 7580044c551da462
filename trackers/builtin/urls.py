app_name = "builtin"
urlpatterns = []
