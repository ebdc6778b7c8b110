import type { Routes } from '../http.js';

export const adapterRoutes: Routes = {};
